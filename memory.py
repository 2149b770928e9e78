"""What one train.py step holds in GPU memory, computed from tensor sizes (not measured), and which flags
make it fit a 6, 8 or 12 GB card.

    python memory.py                 # the table for Qwen2.5-0.5B and 1.5B at train.py's defaults
    python memory.py --micro_batch_size 4 --max_completion_length 256     # any train.py flag

Where the bytes are, and every formula: engine/memory.py (with engine/sizes.py, which the dense rollout
copy's fit check shares).
"""

from engine import errors, memory

if __name__ == "__main__":
    errors.run_script(memory.main)
