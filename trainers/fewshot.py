"""Linear few-shot accuracy (closed-form ridge on frozen pre-logit features) of a model.

python trainers/fewshot.py --source workdir/demo --shots 1,5,10,25
python trainers/fewshot.py --helpshort
"""

import sys

try:
    from keras_mixer import programs
except ImportError as e:  # run from a checkout that was not installed
    sys.exit(f"error: {e}. Install the package first, from the checkout: pip install -e .")

if __name__ == "__main__":
    programs.fewshot()
