"""Small real microscopy images with instance masks, shipped inside the package.

Five training and two test pairs (nuclei 256x256, phase-contrast bacteria 288x320;
uint16 labels, 0 = background), about 0.75 MB. They make ``cellpose-finetuning demo``
work from an installed wheel, anywhere. Sources and licenses: ``README.md`` beside
this file. In the repository the four folders are links to ``tests/assets/dev/``
(one copy of each file); the wheel carries the files themselves.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["sample_data_dir"]


def sample_data_dir() -> Path:
    """The folder with ``images/{train,test}/`` and ``annotations/{train,test}/``.

    Returns
    -------
    Path
        A real directory inside the installed package.

    Raises
    ------
    FileNotFoundError
        The package was installed without its data (e.g. imported from a zip).
    """
    root = Path(str(files(__name__)))
    if not (root / "images" / "train").is_dir():
        raise FileNotFoundError(
            f"the sample images are missing from {root}: reinstall cellpose-finetuning "
            "from its wheel (they ship as package data)"
        )
    return root
