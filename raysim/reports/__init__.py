"""Pages and tables read from run directories, never from a live run (layer 8): the run report
(`run_report` assembles the page from `run_view`, `run_sections`, `classification_sections` and
`segmentation_sections`), comparisons of runs pooled over seeds (`compare`, the data model;
`compare_plots`, its rendering and the files `--out` writes), Tune study reports (`study`) and the
figure helpers they share (`figures`)."""
