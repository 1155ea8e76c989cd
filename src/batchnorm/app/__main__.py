import sys

from batchnorm.app.cli import entry

sys.exit(entry())
