"""The lab's Linux guest for these tests (see tests.plugins.guest_support)."""
from tests.plugins.guest_support import guests_dir, linux_guest  # noqa: F401
