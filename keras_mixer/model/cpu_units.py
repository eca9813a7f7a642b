"""What this machine's CPU has for matrix products: the flags that decide bf16 speed.

Standard library only, so `benchmarks/compare.py` loads this file without importing Keras.
"""

# /proc/cpuinfo flag -> the name people know it by. AMX (Intel Sapphire Rapids and later) and
# AVX512-BF16 (Intel Cooper Lake and later, AMD Zen 4 and later) multiply bf16 matrices in hardware;
# AVX512-VNNI does the same for int8.
MATRIX_FLAGS = {
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "avx512_bf16": "AVX512-BF16",
    "avx512_vnni": "AVX512-VNNI",
}
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def flags(path="/proc/cpuinfo"):
    """The CPU's feature flags (empty where the file is missing: not Linux, or not x86)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def matrix_features(path="/proc/cpuinfo"):
    """The matrix units of `MATRIX_FLAGS` this CPU has, by name ("AMX-BF16", ...), in table order."""
    present = flags(path)
    return [name for flag, name in MATRIX_FLAGS.items() if flag in present]


def has_bf16_units(path="/proc/cpuinfo"):
    """True when the CPU multiplies bf16 matrices in hardware (AMX-BF16 or AVX512-BF16)."""
    return bool(flags(path) & set(BF16_FLAGS))
