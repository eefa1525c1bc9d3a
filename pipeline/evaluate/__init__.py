"""k-NN evaluation of a (teacher) backbone: features as Ray Data batch inference, weighted k-NN."""
