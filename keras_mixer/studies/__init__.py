"""The paper's own studies as tools.

    permutation      section 3.4: Mixer vs a CNN under fixed patch/pixel shuffles of the input
    token_pictures   section 3.5: the first token-mixing layer's units drawn on the patch grid
    fewshot          linear few-shot probes of frozen pre-logit features (closed-form ridge)

Each has a command (`trainers/study_permutation.py`, `trainers/visualize.py`,
`trainers/fewshot.py`) that runs on the embedded digits by default.
"""
