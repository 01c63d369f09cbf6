"""The `keras-split` command.

This module imports neither TensorFlow nor Keras: each command imports what it
needs when it runs, after `keras_split.apps.quiet` has set TensorFlow up to
start without its C++ log lines (`--verbose` shows them). `keras-split certs`
never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import signal
import sys

from keras_split.apps.quiet import filtered_stderr, quiet_tensorflow


def _demo(args) -> int:
    from keras_split.apps.demo import build_demo_cnn, run_demo
    from keras_split.planning import cut_candidates

    if args.list_cuts:
        cut_candidates(build_demo_cnn()).summary()
        return 0
    run_demo(epochs=args.epochs, cut=args.cut, batch_size=args.batch_size,
             learning_rate=args.learning_rate, seed=args.seed, verbose=2 if args.quiet else 1)
    return 0


def _plan(args) -> int:
    import keras

    from keras_split.planning import plan

    if args.model and args.app:
        raise ValueError("Give --model or --app, not both.")
    if args.model:
        model = keras.models.load_model(args.model, compile=False)  # the user's own file
    elif args.app:
        build = getattr(keras.applications, args.app, None)
        if not callable(build):
            raise ValueError(f"--app {args.app!r} is not a keras.applications network; try "
                             "VGG16, ResNet50, MobileNetV2, EfficientNetB0, DenseNet121.")
        model = build(input_shape=_shape(args.input_shape), classes=args.classes,
                      weights=None)
    else:
        from keras_split.apps.demo import build_demo_cnn

        model = build_demo_cnn()
    configurations = [c.strip() for c in args.configurations.split(",") if c.strip()]
    plan(model, samples=args.samples, num_clients=args.clients, epochs=args.epochs,
         batch_size=args.batch_size, cut=args.cut, configurations=configurations,
         local_epochs=args.local_epochs, label_bytes=args.label_bytes,
         backward_factor=args.backward_factor).summary()
    return 0


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--input-shape must be height,width,channels such as 32,32,3; "
                         f"received {text!r}.")
    return shape


# keras_split.planning.CONFIGURATIONS, written out: building the parser must not
# import Keras (a test checks the two agree).
PLAN_CONFIGURATIONS = ("vanilla", "round_robin", "splitfed", "federated", "large_batch_sgd")


def _plan_command(commands) -> None:
    plan = commands.add_parser(
        "plan",
        help="what training at each cut costs each client: FLOPs and bytes, split vs federated",
        description=(
            "Print, for each candidate cut (or --cut), what each client computes (forward and "
            "backward FLOPs) and sends and receives over the whole training, and what the "
            "server computes, for split learning (vanilla, round-robin, SplitFed), federated "
            "learning and large-batch synchronous SGD. Nothing trains. The model is --model "
            "(a .keras file), --app (a keras.applications network, weights not needed) or, "
            "by default, the demo CNN. Formulas: help(keras_split.plan)."
        ),
    )
    source = plan.add_argument_group("the model")
    source.add_argument("--model", help="a whole (unsplit) model, a .keras file")
    source.add_argument("--app", help="a keras.applications network by name, e.g. VGG16")
    source.add_argument("--input-shape", default="32,32,3",
                        help="with --app: height,width,channels (default 32,32,3)")
    source.add_argument("--classes", type=int, default=10, help="with --app (default 10)")
    plan.add_argument("--samples", type=int, required=True,
                      help="training samples, all clients together")
    plan.add_argument("--clients", type=int, required=True, help="number of clients")
    plan.add_argument("--epochs", type=int, default=1, help="epochs (default 1)")
    plan.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    plan.add_argument("--cut", help="one cut layer (default: every candidate cut)")
    plan.add_argument("--local-epochs", type=int, default=1,
                      help="epochs per round for SplitFed and FedAvg (default 1)")
    plan.add_argument("--configurations", default=",".join(PLAN_CONFIGURATIONS),
                      help=f"comma-separated subset of {','.join(PLAN_CONFIGURATIONS)}")
    plan.add_argument("--label-bytes", type=int, default=8,
                      help="bytes per label sent to the server (default 8: an int64)")
    plan.add_argument("--backward-factor", type=float, default=2.0,
                      help="backward FLOPs as a multiple of forward (default 2)")
    plan.set_defaults(run=_plan)


def _audit(args) -> int:
    import keras
    import numpy as np

    import keras_split
    from keras_split.apps.demo import build_demo_cnn, demo_loss
    from keras_split.privacy import (
        GaussianGradientNoise,
        MaxNormAlignment,
        NoPeek,
        add_cut_noise,
        audit,
    )
    from keras_split.roles import ServerRole
    from keras_split.transport import InProcessTransport

    if args.data:
        (x, y), _, (x_test, y_test) = keras_split.datasets.read_medmnist_npz(args.data)
    else:
        (x, y), _, (x_test, y_test) = keras_split.datasets.load_pneumoniamnist_balanced()
    if y.ndim != 1:
        raise ValueError(f"`keras-split audit` needs single-label class data; {args.data!r} "
                         f"holds labels of shape {y.shape[1:]} per sample.")
    classes = int(max(y.max(), y_test.max())) + 1
    keras.utils.set_random_seed(args.seed)
    if args.model:
        model = keras.models.load_model(args.model)  # the user's own file
        loss = keras.losses.get(args.loss or "sparse_categorical_crossentropy")
    else:
        model = build_demo_cnn(x.shape[1:], max(2, classes))
        loss = keras.losses.get(args.loss) if args.loss else demo_loss()
    split = keras_split.split(model, args.cut)
    if args.noise or args.clip:
        client = add_cut_noise(split.client, clip_norm=args.clip, scale=args.noise or 0.0,
                               seed=args.seed)
        split = keras_split.SplitModel(client=client, server=split.server)
    role = ServerRole(split.server, keras.optimizers.Adam(args.learning_rate), loss,
                      metrics=["accuracy"])
    if args.label_defence == "max-norm":
        role = MaxNormAlignment(role, seed=args.seed)
    elif args.label_defence == "gaussian":
        role = GaussianGradientNoise(role, ratio=args.gaussian_ratio, seed=args.seed)
    split.compile(optimizer=keras.optimizers.Adam(args.learning_rate),
                  transport=InProcessTransport(role),
                  nopeek=NoPeek(args.nopeek) if args.nopeek else None)
    defences = [name for name, on in [(f"NoPeek alpha {args.nopeek}", args.nopeek),
                                      (f"cut noise sigma {args.noise}, clip {args.clip}",
                                       args.noise or args.clip),
                                      (f"label defence {args.label_defence}",
                                       args.label_defence != "none")] if on]
    print(f"training {model.name} split at {args.cut!r} for {args.epochs} epoch(s) on "
          f"{len(x)} samples; defences: {', '.join(defences) or 'none'}")
    split.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=2, seed=args.seed)
    merged = split.merge()
    logits = np.concatenate([np.asarray(merged(x_test[i:i + 256], training=False))
                             for i in range(0, len(x_test), 256)])
    print(f"test accuracy {np.mean(np.argmax(logits, -1) == y_test):.4f} on {len(x_test)} "
          "samples\n")
    audit(split, x, y, x_test, batch_size=args.batch_size,
          inversion_epochs=args.inversion_epochs, hijack_steps=args.hijack_steps,
          hijack_knows_weights=not args.hijack_blind,
          num_classes=max(2, classes), seed=args.seed, y_test=y_test)
    return 0


def _halves(args) -> int:
    from keras_split.apps.netdemo import save_halves

    client, server = save_halves(args.out, cut=args.cut)
    print(f"wrote {client} (keep on the client) and {server} (give to the server)")
    return 0


def _export(args) -> int:
    import keras

    from keras_split.export.artefacts import write_artefacts

    if args.model:
        client = keras.models.load_model(args.model)  # the user's own file
    else:
        from keras_split.apps.netdemo import save_halves

        client_path, _ = save_halves(args.out, cut=args.cut, seed=args.seed)
        client = keras.models.load_model(client_path)
    optimizer = keras.optimizers.get(args.optimizer)
    optimizer.learning_rate = args.learning_rate
    if args.quiet:
        # The converters' C++ INFO/WARNING lines ("Ignored output_format", LiteRT's
        # "Created TensorFlow Lite XNNPACK delegate") are noise here; errors are kept.
        with filtered_stderr():
            manifest = write_artefacts(client, args.out, optimizer)
    else:
        manifest = write_artefacts(client, args.out, optimizer)
    for entry in manifest["files"]:
        check = entry.get("train_step_error", entry.get("inference_error"))
        print(f"{entry['file']:32} {entry['bytes']:>9,} bytes  {entry['kind']:32} "
              f"check error {check:.2g}")
    print(f"manifest: {args.out}/manifest.json")
    return 0


def _certs(args) -> int:
    from keras_split.network.devcerts import write_dev_certificates

    for name, path in write_dev_certificates(args.out).items():
        print(f"{name:12} {path}")
    print("Development certificates for localhost/127.0.0.1, valid one day. Not for production.")
    return 0


class _Terminated(Exception):
    """SIGTERM arrived: stop cleanly, as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminated


def _rounds_options(args):
    if args.rounds is None:
        return None
    if not args.client_model:
        raise ValueError("--rounds needs --client-model (the client half's .keras file, whose "
                         "initial weights the server hands out in the first round).")
    return {"mode": args.round_mode, "rounds": args.rounds, "clients": args.clients,
            "turn_timeout": args.turn_timeout, "client_model": args.client_model}


def _serve(args) -> int:
    import logging

    from keras_split.apps.netdemo import make_server, read_tokens, save_trained

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.linger < 0:
        raise ValueError(f"--linger must be at least 0 seconds, received {args.linger:g}.")
    server = make_server(
        args.model, args.loss, args.from_logits, args.optimizer, args.learning_rate,
        args.metrics, tokens=read_tokens(args.token_file) if args.token_file else None,
        address=args.address,
        certificate=args.cert, private_key=args.key, client_ca=args.client_ca,
        insecure=args.insecure, max_batch_size=args.max_batch_size,
        checkpoint_dir=args.checkpoint_dir, durable_checkpoints=args.durable_checkpoints,
        rounds=_rounds_options(args), max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_workers=args.max_workers, group_steps=args.group_steps,
        replay_window=args.replay_window,
    ).start()
    coordinator = server.coordinator
    until = "Ctrl-C to stop" if coordinator is None else \
        f"stops after round {coordinator.rounds} (Ctrl-C to stop now)"
    print(f"serving {args.model} on {server.address} "
          f"({'INSECURE, no TLS' if args.insecure else 'TLS'}); {until}", flush=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    rounds_over = False
    try:
        if coordinator is None:
            server.wait()
        else:
            rounds_over = server.wait_for_rounds(linger=args.linger)
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        if previous is not None:  # None: a handler not set from Python, left as it was
            signal.signal(signal.SIGTERM, previous)
    if rounds_over:
        for record in coordinator.history:
            trained = ", ".join(map(str, record.trained)) or "nobody"
            dropped = f", dropped {', '.join(map(str, record.dropped))}" if record.dropped else ""
            print(f"round {record.round}: trained {trained}{dropped}", flush=True)
        print(f"rounds finished: {coordinator.rounds} {args.round_mode} round(s) with "
              f"{len(coordinator.members)} client(s); stopping the server", flush=True)
    server.stop(grace=5)
    if server.checkpoint_path is not None:
        print(f"stopped; checkpoint written to {server.checkpoint_path}", flush=True)
    if args.save:
        save_trained(server, args.save, client_model=args.client_model,
                     print_fn=lambda text: print(text, flush=True))
    return 0


def _client(args) -> int:
    from keras_split.apps.netdemo import train_client

    train_client(args.model, args.server, args.token, args.epochs, args.batch_size,
                 args.learning_rate, root_certificates=args.ca, certificate=args.cert,
                 private_key=args.key, insecure=args.insecure, compression=args.compression,
                 checkpoint_dir=args.checkpoint_dir, seed=args.seed,
                 durable_checkpoints=args.durable_checkpoints, shard=args.shard,
                 rounds=args.rounds, data=args.data, save=args.save, pipeline=args.pipeline)
    return 0


def _shapes(tensors) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tensors)


def _merge(args) -> int:
    from keras_split.apps.netdemo import load_model, merge_halves

    if not args.out.endswith(".keras"):
        raise ValueError(f"OUT must be a .keras file, received {args.out!r}: Keras saves whole "
                         "models in that format (e.g. trained/model.keras).")
    model = merge_halves(load_model(args.client, "CLIENT"), load_model(args.server, "SERVER"))
    model.save(args.out)
    print(f"wrote {args.out}: {_shapes(model.inputs)} -> {_shapes(model.outputs)}, "
          f"{model.count_params():,} parameters; load it with keras.models.load_model")
    return 0


def _network_commands(commands) -> None:
    halves = commands.add_parser("halves", help="save the demo CNN's two halves as .keras files")
    halves.add_argument("--out", required=True, help="folder for client.keras and server.keras")
    halves.add_argument("--cut", default="pool2", help="cut layer (default pool2)")
    halves.set_defaults(run=_halves)

    export = commands.add_parser(
        "export", help="export a client half for devices (LiteRT, ONNX) with a manifest")
    export.add_argument("--out", default="saved_models/demo", help="output folder")
    export.add_argument("--model", help="a client half (.keras); default: the demo's")
    export.add_argument("--cut", default="pool2", help="demo cut layer (default pool2)")
    export.add_argument("--seed", type=int, default=0, help="demo initial weights seed")
    export.add_argument("--optimizer", default="adam", choices=["adam", "sgd"],
                        help="the device's optimizer (default adam)")
    export.add_argument("--learning-rate", type=float, default=1e-3)
    export.set_defaults(run=_export)

    certs = commands.add_parser(
        "certs", help="write a throwaway CA and localhost certificates (development only)")
    certs.add_argument("--out", required=True, help="folder for the PEM files")
    certs.set_defaults(run=_certs, tensorflow=False)

    serve = commands.add_parser("serve", help="serve a server half over gRPC (TLS by default)")
    serve.add_argument("--model", required=True, help="the server half, a .keras file")
    serve.add_argument("--loss", default="sparse_categorical_crossentropy",
                       help="Keras loss name (default sparse_categorical_crossentropy)")
    serve.add_argument("--from-logits", action="store_true",
                       help="the model outputs logits (the demo CNN does)")
    serve.add_argument("--optimizer", default="adam", help="Keras optimizer name (default adam)")
    serve.add_argument("--learning-rate", type=float, default=1e-3)
    serve.add_argument("--metrics", nargs="*", default=["accuracy"])
    serve.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT to listen on")
    serve.add_argument("--cert", help="server certificate (PEM)")
    serve.add_argument("--key", help="server private key (PEM)")
    serve.add_argument("--client-ca", help="CA of client certificates: require mutual TLS")
    serve.add_argument("--insecure", action="store_true",
                       help="serve without TLS (logs a warning; loopback testing only)")
    serve.add_argument("--token-file",
                       help="file of 'TOKEN CLIENT_ID' lines: the clients allowed in (optional "
                            "with --client-ca: certificates then name the clients)")
    serve.add_argument("--max-batch-size", type=int, default=1024,
                       help="largest batch accepted; sets the message size limit")
    serve.add_argument("--max-concurrent-rpcs", type=int, default=256,
                       help="calls the server holds at once, all clients together; more are "
                            "refused with RESOURCE_EXHAUSTED (default 256; raise it for "
                            "hundreds of clients)")
    serve.add_argument("--max-workers", type=int, default=4,
                       help="threads for the model's work (default 4); waiting calls use none")
    serve.add_argument("--group-steps", type=int, metavar="N",
                       help="run the training steps of up to N concurrent clients as one "
                            "server step on their concatenated activations (ParallelRole)")
    serve.add_argument("--replay-window", type=int, default=1, metavar="D",
                       help="replies kept per session to answer resent steps: give clients "
                            "that pipeline D steps (--pipeline D) a window of D so a dropped "
                            "link loses none (default 1)")
    serve.add_argument("--checkpoint-dir",
                       help="checkpoint after every step here, and resume from it on start")
    serve.add_argument("--durable-checkpoints", action="store_true",
                       help="fsync each checkpoint (survive power loss, not only a crash)")
    serve.add_argument("--rounds", type=int,
                       help="coordinate this many rounds of client processes, then exit")
    serve.add_argument("--round-mode", default="round_robin",
                       choices=["round_robin", "splitfed", "sflv1"],
                       help="round-robin turns, SplitFed (shared server half) or SFLv1 "
                            "(a server copy per client)")
    serve.add_argument("--clients", type=int, default=2,
                       help="clients the first round waits for (default 2)")
    serve.add_argument("--turn-timeout", type=float, default=120.0,
                       help="seconds a client has to report its turn before it is dropped")
    serve.add_argument("--client-model",
                       help="the client half (.keras): its initial weights, for --rounds")
    serve.add_argument("--linger", type=float, default=10.0,
                       help="with --rounds: seconds without a call after the last round before "
                            "the server exits (the clients evaluate first; default 10)")
    serve.add_argument("--save", metavar="DIR",
                       help="when the server stops, write its trained half to DIR/server.keras "
                            "(with --rounds also the final client half, DIR/client.keras, and "
                            "the merged model, DIR/model.keras)")
    serve.set_defaults(run=_serve)

    client = commands.add_parser(
        "client", help="train a client half on your data (or the shipped X-rays) against a "
                       "server")
    client.add_argument("--model", required=True, help="the client half, a .keras file")
    client.add_argument("--data", metavar="FILE.npz",
                        help="your data, a .npz in MedMNIST layout: train_images, train_labels, "
                             "val_images, val_labels, test_images, test_labels (default: the "
                             "shipped balanced PneumoniaMNIST chest X-rays)")
    client.add_argument("--save", metavar="DIR",
                        help="after training, write the trained client half to "
                             "DIR/client.keras")
    client.add_argument("--server", required=True, help="the server's HOST:PORT")
    client.add_argument("--token", help="this client's token (optional with mutual TLS)")
    client.add_argument("--ca", help="CA that signed the server's certificate (PEM)")
    client.add_argument("--cert", help="client certificate, for mutual TLS")
    client.add_argument("--key", help="client private key, for mutual TLS")
    client.add_argument("--insecure", action="store_true", help="connect without TLS")
    client.add_argument("--epochs", type=int, default=5)
    client.add_argument("--batch-size", type=int, default=64)
    client.add_argument("--learning-rate", type=float, default=1e-3)
    client.add_argument("--compression", default=None,
                        help="codec for cut tensors: float16, bfloat16, int8, topk, topk:0.05")
    client.add_argument("--checkpoint-dir",
                        help="checkpoint after every step here; rerun the same command to "
                             "resume after a crash or SIGTERM")
    client.add_argument("--durable-checkpoints", action="store_true",
                        help="fsync each checkpoint (survive power loss, not only a crash)")
    client.add_argument("--pipeline", type=int, default=1, metavar="D",
                        help="keep up to D training steps in flight, hiding the link's round "
                             "trip (default 1: one at a time; 4 for links of tens of ms; see "
                             "docs/network.md)")
    client.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    client.add_argument("--shard", type=_shard, help="I/K: train on the I-th of K IID shares "
                                                     "of the data (one hospital of K)")
    client.add_argument("--rounds", action="store_true",
                        help="take part in the server's rounds (--epochs per turn)")
    client.set_defaults(run=_client)

    merge = commands.add_parser(
        "merge", help="rebuild the whole model from a client half and a server half",
        description="Rebuild one Keras model from the two halves (e.g. those written by "
                    "`client --save` and `serve --save`): the server half applied to the "
                    "client half's outputs, with the server half's loss and metrics.")
    merge.add_argument("client", metavar="CLIENT.keras", help="the client half")
    merge.add_argument("server", metavar="SERVER.keras", help="the server half")
    merge.add_argument("out", metavar="OUT.keras", help="where to write the whole model")
    merge.set_defaults(run=_merge)


def _audit_command(commands) -> None:
    audit = commands.add_parser(
        "audit",
        help="train a split, then attack it: what could a curious or malicious server learn?",
        description=(
            "Train a split model (the demo CNN on the shipped chest X-rays, or --model on "
            "--data), with the defences you name, then run the attack harness on it and print "
            "one table: label leakage from the cut gradients (norm and cosine attacks, AUC), "
            "model inversion from the cut activations (MSE and SSIM against the mean image), "
            "dCor(x, cut), and with --hijack-steps a hijacking server and the hijack detector. "
            "In process, on this machine: nothing is sent anywhere."
        ),
    )
    audit.add_argument("--model", help="your own .keras model to split (default: the demo CNN)")
    audit.add_argument("--cut", default="pool2", help="the cut layer (default pool2)")
    audit.add_argument("--data", help="a MedMNIST-layout .npz (default: the shipped X-rays)")
    audit.add_argument("--loss", help="the server's loss (default: cross-entropy)")
    audit.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    audit.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    audit.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    audit.add_argument("--nopeek", type=float, default=0.0, help="NoPeek alpha (default off)")
    audit.add_argument("--noise", type=float, default=0.0,
                       help="Gaussian noise sigma on the cut (not differential privacy)")
    audit.add_argument("--clip", type=float, default=None,
                       help="clip each sample's cut activations to this norm first")
    audit.add_argument("--label-defence", choices=["none", "max-norm", "gaussian"],
                       default="none", help="server-side gradient perturbation (default none)")
    audit.add_argument("--gaussian-ratio", type=float, default=1.0,
                       help="noise norm over the largest gradient norm (--label-defence gaussian)")
    audit.add_argument("--inversion-epochs", type=int, default=30,
                       help="the inverse network's training epochs (default 30)")
    audit.add_argument("--hijack-steps", type=int, default=0,
                       help="also run a hijacking server this many steps (default 0: skip)")
    audit.add_argument("--hijack-blind", action="store_true",
                       help="the hijacking server did not supply the model (its pilot starts "
                            "from fresh weights; by default it starts from the client's)")
    audit.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    audit.set_defaults(run=_audit)


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/K (e.g. 0/3), received {text!r}") from None
    return index, count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-split", description="Split learning for TensorFlow/Keras."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train a split CNN on the shipped chest X-rays, beside the unsplit model",
        description=(
            "Train a small CNN on the shipped balanced PneumoniaMNIST subset (real pediatric "
            "chest X-rays, offline) twice from the same initial weights: split at --cut, with "
            "only cut activations and gradients crossing, and unsplit with keras.Model.fit. "
            "Prints both test accuracies and the bytes per sample that crossed the cut."
        ),
    )
    demo.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    demo.add_argument(
        "--cut", default="pool2",
        help="layer whose output is sent to the server (default pool2; see --list-cuts)",
    )
    demo.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    demo.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bar")
    demo.add_argument(
        "--list-cuts", action="store_true",
        help="list the valid cut layers with bytes per sample, client parameters and FLOPs",
    )
    demo.set_defaults(run=_demo)
    _audit_command(commands)
    _plan_command(commands)
    _network_commands(commands)
    for command in commands.choices.values():
        command.add_argument("--verbose", action="store_true",
                             help="show TensorFlow's start-up and C++ log lines (hidden by "
                                  "default, unless TF_CPP_MIN_LOG_LEVEL is set)")
    return parser


def _is_user_error(error: BaseException) -> bool:
    """Errors whose message is written for the user (a bad flag, a missing file,
    a refusal by the server): one line, no traceback."""
    if isinstance(error, (ValueError, TypeError, OSError, ImportError)):
        return True
    rpc = sys.modules.get("keras_split_wire.rpc")  # not imported: none of its errors raised
    return rpc is not None and isinstance(error, rpc.ServerError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("epochs", "batch_size", "max_concurrent_rpcs", "max_workers", "group_steps",
                 "pipeline", "replay_window"):
        value = getattr(args, name, 1)
        value = 1 if value is None else value
        if value < 1:
            print(f"keras-split: --{name.replace('_', '-')} must be at least 1, got {value}.",
                  file=sys.stderr)
            return 2
    try:
        args.quiet = getattr(args, "tensorflow", True) and quiet_tensorflow(args.verbose)
        return args.run(args)
    except KeyboardInterrupt:
        print("keras-split: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not _is_user_error(error):
            raise
        # User errors (a bad --cut, say) get the message, not a traceback.
        text = " ".join(str(error).split())
        print(f"keras-split: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
