# Lets the tests/tasks/test_task_*.py files import the shared rule checkers (taskcheck.py)
# under any pytest import mode.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
