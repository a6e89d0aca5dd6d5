"""The model, the IAIS regularizer and ISD metrics, pretraining objectives and the DeepSpeed trainer."""
