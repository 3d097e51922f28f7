import sys

from deploy.rollout.cli import main

sys.exit(main())
