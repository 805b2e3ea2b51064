"""The one base class for what the user can fix: a config, a token file or vocabulary, a checkpoint, a
dataset, a Hugging Face directory, an out_dir (taken, or out of space), a run that diverged. The
scripts catch it at the top (runtime.exits.run_main) and print one `error:` line; anything else is a
bug in our code and keeps its traceback. Each kind is defined next to the code that raises it.
"""


class UserError(Exception):
    """Something the user can fix, said in one line that names the file or key and what to do."""

    exit_code = 2
    # A config's errors come out the same on every torchrun rank: rank 0 alone says them, instead of one
    # copy per process. Errors of files and folders may differ between ranks (and hosts), so all say them.
    same_on_every_rank = False
