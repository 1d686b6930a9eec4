/*
 * Empty loadable module of the citus-reconcile stand-in, so that
 * shared_preload_libraries = 'citus' works where the real extension is absent.
 */
#include "postgres.h"
#include "fmgr.h"

PG_MODULE_MAGIC;

void _PG_init(void);

void
_PG_init(void)
{
}
