"""A module of the runner example's package: executors import it from the unpacked package."""


def area(w: float, h: float = 1.0) -> float:
    return w * h
