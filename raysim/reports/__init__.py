"""Pages and tables read from run directories, never from a live run: the run report
(`run_report`), comparisons of runs pooled over seeds (`compare`, plots in `compare_plots`),
Tune study reports (`study`) and the figure helpers they share (`figures`)."""
