"""Plain records the mesh reasons about: applications (:mod:`.spec`), resources
(:mod:`.resources`), sessions, tasks, executors and instances (:mod:`.records`), and who may
do what (:mod:`.auth`).  No sockets; :mod:`.auth`'s store functions take a Store."""
