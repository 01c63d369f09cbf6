"""A client process taking part in the server's rounds:
python round_client.py MODEL.keras DATA.npz PORT TOKEN"""

import sys

import keras
import numpy as np

import keras_split

if __name__ == "__main__":
    model_path, data_path, port, token = sys.argv[1:5]
    with np.load(data_path) as data:
        x, y = data["x"], data["y"]
    client = keras_split.SplitClient(keras.models.load_model(model_path),
                                     server=f"127.0.0.1:{port}", token=token, insecure=True)
    client.compile(keras.optimizers.SGD(0.1))
    rounds = client.train_rounds(x, y, batch_size=16, seed=0,
                                 on_turn=lambda r: print(f"turn in round {r}", flush=True))
    print(f"trained in rounds {rounds}", flush=True)
