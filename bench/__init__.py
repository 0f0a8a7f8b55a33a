"""The relay benchmark (issue 7): ``python -m bench``; method and figures in bench/RESULTS.md."""
