"""reactor: automates a self-hosted Supabase/PostgreSQL with pgmq, pg_cron and a trio worker."""

__version__ = "0.1.0"
