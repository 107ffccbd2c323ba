"""The part of hvd_gradalign that needs no TensorFlow: the names and rules of its settings
and its crash-safe files. The library is built on it; the training config and the sweeps'
bookkeeping (status, reports, restore) use it alone, so they start in well under a second.
Importing it never imports TensorFlow or Keras (tests/test_import_graph.py checks).
"""
