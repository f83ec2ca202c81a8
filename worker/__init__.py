"""The workers (generate and train). Importing any worker module first quietens the library log records that
worker/library_logs.py names, so that they are in place before bitsandbytes is imported."""

from worker.library_logs import quieten_library_logs

quieten_library_logs()
