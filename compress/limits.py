"""Upper bounds of the numbers that reach torch (the CLI's ranges and the configs' fields share
them): beyond them torch overflows ("Overflow when unpacking long long") or a run never ends."""

MAX_SEQ_LEN = 2**24  # tokens in one window, prompt or generation
MAX_SAMPLES = 2**20  # calibration windows
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0..2**64-1
MAX_TOKENS = 2**40  # perplexity tokens (reading stops at the end of the text anyway)
MAX_LIMIT = 2**31  # MMLU questions per subject
MAX_COUNT = 2**31 - 1  # other counts that become tensor sizes (batch sizes)
