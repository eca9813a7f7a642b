"""The paper's two training setups, which the recipes build on (a file whose name starts with "_" is
not a recipe itself)."""


def paper_pretraining(**row):
    """The paper's pre-training setup (224x224, Adam 0.9/0.999 with decoupled weight decay, 10k
    warmup steps then linear decay, batch 4096, clipping at 1) with one row of Table 4 on top."""
    defaults = dict(
        mode="pretrain",
        image_size=224,
        batch_size=4096,
        optimizer="adamw",
        beta_1=0.9,
        beta_2=0.999,
        schedule="warmup_linear",
        warmup_steps=10_000,
        grad_clip_norm=1.0,
        checkpoint_every=1000,
        log_every=100,
        steps_per_loop=100,
        mixed_precision="bfloat16",
    )
    return {**defaults, **row}


def paper_finetuning(**task):
    """The paper's fine-tuning setup (SGD momentum 0.9, 500 warmup steps then cosine, clipping at 1,
    no weight decay, batch 512, a zero head for a new class count) with one task on top."""
    defaults = dict(
        mode="finetune",
        model="B/16",
        init="imagenet21k",
        image_size=224,
        batch_size=512,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=0.0,
        schedule="warmup_cosine",
        warmup_steps=500,
        grad_clip_norm=1.0,
        checkpoint_every=500,
        log_every=50,
    )
    return {**defaults, **task}
