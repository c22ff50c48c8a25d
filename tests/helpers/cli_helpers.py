"""Assertions on what the `igdrec` command prints."""


def one_line_error(result, *needles):
    """The command failed with exactly one `error:` line that contains every needle."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
