"""The precisions a model trains and serves in, by name (no Keras: the recipe checks read them)."""

# Mixed-precision training: the compute dtype of Keras' "mixed_<name>" policy (variables stay float32).
MIXED = ("bfloat16", "float16")

# Served precision -> the Keras dtype policy its export computes in (bfloat16: bf16 products,
# float32 statistics and logits).
SERVING = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
