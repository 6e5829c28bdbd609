"""Convert a Mamba checkpoint to MLX: `python convert.py --hf-path SRC --mlx-path DST [-q]`.

The work is done by `mlx_mamba.convert`; see `python convert.py --help`.
"""

from mlx_mamba.convert import main

if __name__ == "__main__":
    main()
