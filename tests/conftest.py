"""pytest: the *_runner.py scripts are started as subprocesses by the tests, never imported
(one sets TF_USE_LEGACY_KERAS at import, which would leak into every later test)."""

collect_ignore_glob = ["*_runner.py"]
