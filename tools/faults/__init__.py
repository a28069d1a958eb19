"""Fault and load runs against real ``dmft serve`` processes, shared by ``tests/test_faults.py`` (short) and
``bench/faults.py`` (as long as asked).

``probe`` counts answers and measures memory, ``sessions`` streams sessions as a client that retries by
``seq`` would and audits what the service kept, ``scenarios`` holds the runs themselves.
"""
