"""two_classes: a test plugin file with two Plugin subclasses, which the loader refuses."""

from qpgevent.plugin import Plugin


class First(Plugin):
    pass


class Second(Plugin):
    pass
