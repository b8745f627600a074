"""The data side: from the files a user has to batches on the device. Data flows one way:

    sources (what a folder, index, archive or CIFAR-10 holds) ← imagenet (ImageNet's layouts)
        ← tars (images inside uncompressed tars) ← imageio (one image → RGB 256×256; Member)
    writer (``replica prepare``: the pool, the resume state) → store (reading a prepared store,
        pixel statistics) → loaders (training and evaluation batches, workers) ← jpeg (codecs)
    synth (the demo's generated images)

Each name is imported from the module that defines it (``from replica.data.store import
PreparedStore``); this package re-exports nothing, so importing it loads nothing.
"""
