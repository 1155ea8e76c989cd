import sys

from batchnorm.app.cli import main

sys.exit(main())
