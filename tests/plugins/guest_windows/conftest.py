"""The lab's Windows guest for these tests (see tests.plugins.guest_support)."""
from tests.plugins.guest_support import guests_dir, windows_guest  # noqa: F401
