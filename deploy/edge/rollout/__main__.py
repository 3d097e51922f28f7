import sys

from deploy.edge.rollout.cli import main

sys.exit(main())
