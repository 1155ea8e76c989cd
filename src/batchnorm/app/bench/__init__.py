"""``batchnorm bench``: the command (:mod:`.command`), how it times (:mod:`.timing`), one
new process per case (:mod:`.process`), one module per API level (:mod:`.functional`,
:mod:`.dropin`, :mod:`.sync`) and the printed table (:mod:`.table`)."""
