from .cifar import (MEAN, NUM_CLASSES, STD, DatasetError, DeviceLoader, normalize,
                    random_crop_flip, read_cifar, read_split, torchvision_loader)
