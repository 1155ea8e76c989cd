"""The application: the ``batchnorm`` command, its benchmarks, experiments and report.

It imports the library (``batchnorm.functional``, ``batchnorm.nn``, ``batchnorm.torch``,
``batchnorm.distributed``) and is never imported by it.
"""
