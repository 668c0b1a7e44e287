"""The BraTS conventions, in one place: channels, labels, regions, editions.

Every other module takes these from here: the readers (``storage.nifti``), the synthetic
generator, preprocessing, the metrics and the network's classes.
"""

from __future__ import annotations

import numpy as np

MODALITIES = ("flair", "t1", "t1ce", "t2")  # channel order everywhere
GRADES = ("HGG", "LGG")  # the BraTS 2019 layout's folders

# Labels written for people (BraTS up to 2021; 2023+ writes ET as 3, see ET_LABEL)
LABELS = {1: "NCR/NET", 2: "ED", 4: "ET"}  # necrotic/non-enhancing core, edema, enhancing tumour
REGIONS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}  # whole tumour, tumour core, enhancing tumour

# The network's classes: 0 background, 1 NCR/NET, 2 ED, 3 ET (= label 4)
BRATS_TO_CLASS = np.zeros(5, dtype=np.uint8)
BRATS_TO_CLASS[[1, 2, 4]] = [1, 2, 3]
CLASS_TO_BRATS = np.array([0, 1, 2, 4], dtype=np.uint8)
CLASS_REGIONS = {region: tuple(int(BRATS_TO_CLASS[label]) for label in labels) for region, labels in REGIONS.items()}

# Editions: the file suffix of each channel, and the label of enhancing tumour
SUFFIXES = {
    "brats2019": dict(flair="flair", t1="t1", t1ce="t1ce", t2="t2"),  # BraTS 2012–2021
    "brats2023": dict(flair="t2f", t1="t1n", t1ce="t1c", t2="t2w"),  # BraTS 2023+
}
ET_LABEL = {"brats2019": 4, "brats2023": 3}
