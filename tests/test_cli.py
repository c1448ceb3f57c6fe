"""The `c3a` command as a user meets it: quiet, one line per error."""

import subprocess
import sys
import warnings

from c3a import cli


def test_help_prints_no_third_party_notice():
    """Importing c3a imports PEFT, which imports bitsandbytes, whose CPU backend warns about an optional kernel
    package: that notice must not reach a user of the command."""
    done = subprocess.run([sys.executable, "-m", "c3a.cli", "sft", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--generation-batch-size" in done.stdout
    assert done.stderr == ""


def test_peft_s_deprecated_property_read_is_quiet():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli._quiet_third_parties()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
