"""The data stage: list a corpus, decode + multi-crop on CPU actors, stream to train workers."""
