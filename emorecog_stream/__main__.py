from emorecog_stream.cli import main

raise SystemExit(main())
