"""Layer 2, data: the images a network is trained and evaluated on.

* :mod:`hahnet.data.datasets`: readers for CIFAR-10, image folders and MNIST-style IDX
  files into uint8 tensors, the decode cache, held-out splits, seeded subsets;
* :mod:`hahnet.data.augment`: the paper's random crop and flip, batched on the device;
* :mod:`hahnet.data.jpeg_pack`: a JPEG folder packed byte for byte into one file.

May import: the bottom modules (:mod:`hahnet.config`, :mod:`hahnet.io`,
:mod:`hahnet.errors`) and :mod:`hahnet.nn`. The layer order: docs/architecture.md.
"""
