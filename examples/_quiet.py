"""Imported first by every example, before anything imports TensorFlow: it starts
without its C++ log lines, and its tf.function retracing warning (which the
parties of one process trigger by design) is filtered; errors still show. Set
TF_CPP_MIN_LOG_LEVEL yourself to see everything (see keras_split.apps.quiet)."""

from keras_split.apps.quiet import quiet_tensorflow

quiet_tensorflow()
