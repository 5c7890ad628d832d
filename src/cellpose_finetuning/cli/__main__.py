"""``python -m cellpose_finetuning.cli``: the same as the ``cellpose-finetuning`` command."""

from cellpose_finetuning.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
