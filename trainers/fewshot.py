"""Linear few-shot accuracy (closed-form ridge on frozen pre-logit features) of a model.

python trainers/fewshot.py --source workdir/demo --shots 1,5,10,25
python trainers/fewshot.py --helpshort
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
try:
    from keras_mixer.studies import fewshot_cli
except ImportError as e:  # run from a checkout that was not installed
    sys.exit(f"error: {e}. Install the package first, from the checkout: pip install -e .")

if __name__ == "__main__":
    fewshot_cli.run()
