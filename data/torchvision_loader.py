"""The authors' input pipeline: a torchvision DataLoader with PIL transforms in
worker processes, batches on the CPU. Slower than the device loader; kept for
comparison (the speed benchmark) and for data that do not fit on the device."""
import torch


class PILDataset(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) as PIL images through torchvision transforms, one at a time."""

    def __init__(self, images, labels, transform):
        self.pixels = images.permute(0, 2, 3, 1).numpy()  # HWC, as PIL wants
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.pixels[i])), self.labels[i]


def torchvision_loader(images, labels, batch_size, train, workers, mean, std, augment):
    """Batches of ``augment`` (a list of torchvision transforms of PIL images; empty for
    the test split), then ``ToTensor()`` + ``Normalize(mean, std)``; shuffled for training.

    The workers are started anew every epoch (not persistent): each epoch seeds
    them from the main process's random state, which a checkpoint holds, so a
    resumed run draws the same augmentations as an uninterrupted one."""
    import torchvision.transforms as T

    transform = T.Compose(list(augment) + [T.ToTensor(), T.Normalize(mean, std)])
    drop_last = train and len(labels) % batch_size == 1 and len(labels) > 1
    return torch.utils.data.DataLoader(PILDataset(images, labels, transform), batch_size=batch_size,
                                       shuffle=train, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), drop_last=drop_last)
