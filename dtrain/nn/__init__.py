"""dtrain's layers, written from scratch, with PyTorch's names and weight layouts."""
from dtrain.nn.activation import LeakyReLU, ReLU, Sigmoid, Tanh
from dtrain.nn.batchnorm import BatchNorm1d, BatchNorm2d
from dtrain.nn.conv import Conv2d
from dtrain.nn.dropout import Dropout
from dtrain.nn.flat import FlatParameters
from dtrain.nn.flatten import Flatten
from dtrain.nn.linear import Linear
from dtrain.nn.loss import SoftmaxCrossEntropy, accuracy_counts
from dtrain.nn.lrn import LocalResponseNorm
from dtrain.nn.module import Module, Sequential
from dtrain.nn.pool import AvgPool2d, MaxPool2d

__all__ = [
    "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Conv2d", "Dropout", "FlatParameters", "Flatten",
    "LeakyReLU", "Linear", "LocalResponseNorm", "MaxPool2d", "Module", "ReLU", "Sequential",
    "Sigmoid", "SoftmaxCrossEntropy", "Tanh", "accuracy_counts",
]
