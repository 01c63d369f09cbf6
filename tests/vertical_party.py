"""One party of vertically partitioned training, as its own process:
python vertical_party.py MODEL.keras DATA.npz PORT TOKEN OUT.npz"""

import sys

import keras
import numpy as np

import keras_split

if __name__ == "__main__":
    model_path, data_path, port, token, out = sys.argv[1:6]
    with np.load(data_path) as data:
        x, ids = data["x"], data["ids"]
    client = keras_split.SplitClient(keras.models.load_model(model_path),
                                     server=f"127.0.0.1:{port}", token=token, insecure=True)
    client.compile(keras.optimizers.SGD(0.1))
    client.fit(x, ids, batch_size=32, epochs=2, seed=0, verbose=0)
    np.savez(out, *client.get_weights())
