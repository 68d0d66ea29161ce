"""GitHub glue: the Action's entry point (`parallel-dispatch action`), the sticky PR
comment and workflow commands.  A front end on the core; started by the CLI's `action`.

(Inside this package, `github` the PyGithub distribution is still `import github`:
imports are absolute.)"""
