/* A SQLite VFS that writes each transaction's WAL frames in one system call.

SQLite writes a WAL frame with two pwrite()s, its 24-byte header then its page: ~110 calls for
a commit of 28 deliveries, ~4 us each on the project's VMs, a fifth of the writer's CPU a
delivery (bench/README.md, session 16). This VFS wraps the default one ("unix") and changes one
thing: writes to a WAL file are gathered in memory while they are contiguous, and reach the
file in one write before anything can depend on them:

  - before the WAL is synced (xSync: with synchronous=FULL, every commit, before the commit is
    published) or truncated, before its size is asked, before it is read, closed or given a
    file control, and before a write that does not continue (or overwrite) the gathered bytes;
  - before a commit is published to other connections: SQLite publishes a commit by writing
    the wal-index header in shared memory, after a memory barrier (xShmBarrier on the database
    file); the barrier of a database file first writes out its own connection's WAL. So even
    with synchronous=NORMAL no reader is ever told of a frame that is not in the file;
  - before the WAL's write lock is released (xShmLock on the database file): what is left then
    is a rolled-back transaction's spilled frames, which another writer may next write over.

It gathers only while its connection's commits are known to sync the WAL after their last
write (`gathers`): the connection said synchronous=FULL or EXTRA, its last commit was seen to
sync (a PRAGMA refused inside a transaction says FULL and changes nothing), and SQLite does not
pad commits to a sector (it would write after the sync). So a commit's frames go out in its
sync, whose error is the commit's own; the barrier's write finds nothing left.

What is durable is decided by the sync, as before: the bytes are the same, in the same file,
at the same offsets, written before the same fsync. Only the number of calls changes.

Everything else (locks, shared memory, the database file, journals) is the wrapped VFS's own.
A WAL file is paired with its database file through sqlite3_filename_database(), which gives
back the very name pointer that the database file was opened with (both are one allocation of
that connection's pager): a barrier writes out the WAL of its own connection only, whose calls
SQLite serialises (no lock needed between them).
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>

#define FIRST_CAPACITY (256 * 1024)
/* Past this, written out: a commit of the appender's is ~0.2 MiB; a rebuild's last window (tens
of MiB) gains nothing from more, and would hold it all in memory. */
#define MOST_GATHERED (1024 * 1024)
/* The unix VFS writes at most 0x1ffff bytes a call (its seekAndWrite masks the length, and a
larger write comes back short, as SQLITE_FULL): gathered bytes go out in pieces under that. */
#define MOST_A_CALL (31 * 4096)

typedef struct HlFile HlFile;
struct HlFile {
    sqlite3_file base;
    sqlite3_file *real;  /* the wrapped VFS's file, right after this struct */
    int is_wal;
    HlFile *partner;     /* a database file's WAL, or a WAL's database file (same connection) */
    const char *db_name; /* a database file: the name pointer it was opened with */
    int syncs_commits;   /* a database file: its connection said synchronous=FULL or EXTRA */
    int seen_syncing;    /* a database file: its last commit that wrote the WAL synced it after */
    int unsynced;        /* a WAL: written since its last sync */
    int written;         /* a WAL: written since its database file's last barrier */
    int pads;            /* a WAL: SQLite pads commits to a sector, writing after the sync */
    int failed;          /* a WAL: the error of a write out that could not report it (a barrier) */
    HlFile *next_db;     /* the open database files, to pair a WAL opened later */
    unsigned char *buf;  /* a WAL's gathered bytes: buf_len of them, from buf_off in the file */
    sqlite3_int64 buf_off;
    size_t buf_len;
    size_t buf_cap;
};

static sqlite3_vfs *root_vfs;
static sqlite3_vfs hl_vfs;
static HlFile *open_dbs;
static pthread_mutex_t open_dbs_lock = PTHREAD_MUTEX_INITIALIZER;
/* What it did, for tests and the bench: writes gathered, and the writes that carried them. */
static unsigned long long gathered, written;
#define COUNT(c) __atomic_add_fetch(&(c), 1, __ATOMIC_RELAXED)

#define REAL(p) ((p)->real)
#define RM(p) ((p)->real->pMethods)

static int hl_flush(HlFile *p) {
    if (p->failed) { /* reported by the call after the barrier that met it */
        int failed = p->failed;
        p->failed = SQLITE_OK;
        p->buf_len = 0;
        return failed;
    }
    size_t done = 0, n = p->buf_len;
    p->buf_len = 0; /* written or failed: never written twice */
    while (done < n) {
        size_t chunk = n - done < MOST_A_CALL ? n - done : MOST_A_CALL;
        int rc = RM(p)->xWrite(REAL(p), p->buf + done, (int)chunk, p->buf_off + (sqlite3_int64)done);
        if (rc != SQLITE_OK) return rc;
        COUNT(written);
        done += chunk;
    }
    return SQLITE_OK;
}

static int hl_close(sqlite3_file *f) {
    HlFile *p = (HlFile *)f;
    int rc = SQLITE_OK;
    if (p->is_wal) {
        rc = hl_flush(p);
        if (p->partner) p->partner->partner = NULL;
    } else if (p->db_name) {
        pthread_mutex_lock(&open_dbs_lock);
        for (HlFile **at = &open_dbs; *at; at = &(*at)->next_db) {
            if (*at == p) {
                *at = p->next_db;
                break;
            }
        }
        pthread_mutex_unlock(&open_dbs_lock);
        if (p->partner) p->partner->partner = NULL;
    }
    p->partner = NULL;
    free(p->buf);
    p->buf = NULL;
    int closed = RM(p)->xClose(REAL(p));
    return rc != SQLITE_OK ? rc : closed;
}

static int hl_read(sqlite3_file *f, void *z, int n, sqlite3_int64 off) {
    HlFile *p = (HlFile *)f;
    int rc = hl_flush(p);
    if (rc != SQLITE_OK) return rc;
    return RM(p)->xRead(REAL(p), z, n, off);
}

/* A WAL's writes are gathered only while its connection's commits are known to sync it after
their last write: it said synchronous=FULL (or EXTRA), and its last commit did sync, as seen at
its barrier (a PRAGMA that SQLite then refused, inside a transaction, says FULL and syncs
nothing). So a commit's frames always go out in its sync, whose error is the commit's. Never
where SQLite pads a commit to a sector (no power-safe overwrite), writing after the sync. */
static int gathers(const HlFile *wal) {
    const HlFile *db = wal->partner;
    return db != NULL && db->syncs_commits && db->seen_syncing && !wal->pads;
}

static int hl_write(sqlite3_file *f, const void *z, int n, sqlite3_int64 off) {
    HlFile *p = (HlFile *)f;
    if (p->is_wal) p->unsynced = p->written = 1;
    if (!p->is_wal || n <= 0 || !gathers(p)) {
        int rc = hl_flush(p);
        if (rc != SQLITE_OK) return rc;
        return RM(p)->xWrite(REAL(p), z, n, off);
    }
    if (p->failed) return hl_flush(p);
    if (p->buf_len) {
        sqlite3_int64 end = p->buf_off + (sqlite3_int64)p->buf_len;
        if (off >= p->buf_off && off + n <= end) { /* rewrites gathered bytes (a frame again) */
            COUNT(gathered);
            memcpy(p->buf + (off - p->buf_off), z, (size_t)n);
            return SQLITE_OK;
        }
        if (off != end || p->buf_len + (size_t)n > MOST_GATHERED) {
            int rc = hl_flush(p);
            if (rc != SQLITE_OK) return rc;
        }
    }
    if (p->buf_len + (size_t)n > p->buf_cap) {
        size_t cap = p->buf_cap ? p->buf_cap : FIRST_CAPACITY;
        while (cap < p->buf_len + (size_t)n) cap *= 2;
        unsigned char *grown = realloc(p->buf, cap);
        if (grown == NULL) { /* no memory: write through, as the wrapped VFS would */
            int rc = hl_flush(p);
            if (rc != SQLITE_OK) return rc;
            return RM(p)->xWrite(REAL(p), z, n, off);
        }
        p->buf = grown;
        p->buf_cap = cap;
    }
    if (p->buf_len == 0) p->buf_off = off;
    COUNT(gathered);
    memcpy(p->buf + p->buf_len, z, (size_t)n);
    p->buf_len += (size_t)n;
    return SQLITE_OK;
}

static int hl_truncate(sqlite3_file *f, sqlite3_int64 size) {
    HlFile *p = (HlFile *)f;
    int rc = hl_flush(p);
    if (rc != SQLITE_OK) return rc;
    return RM(p)->xTruncate(REAL(p), size);
}

static int hl_sync(sqlite3_file *f, int flags) {
    HlFile *p = (HlFile *)f;
    int rc = hl_flush(p);
    if (rc != SQLITE_OK) return rc;
    rc = RM(p)->xSync(REAL(p), flags);
    if (rc == SQLITE_OK) p->unsynced = 0;
    return rc;
}

static int hl_file_size(sqlite3_file *f, sqlite3_int64 *size) {
    HlFile *p = (HlFile *)f;
    int rc = hl_flush(p);
    if (rc != SQLITE_OK) return rc;
    return RM(p)->xFileSize(REAL(p), size);
}

static int hl_lock(sqlite3_file *f, int level) {
    HlFile *p = (HlFile *)f;
    return RM(p)->xLock(REAL(p), level);
}

static int hl_unlock(sqlite3_file *f, int level) {
    HlFile *p = (HlFile *)f;
    return RM(p)->xUnlock(REAL(p), level);
}

static int hl_check_reserved_lock(sqlite3_file *f, int *out) {
    HlFile *p = (HlFile *)f;
    return RM(p)->xCheckReservedLock(REAL(p), out);
}

/* Whether PRAGMA synchronous's value makes every commit sync the WAL: FULL and EXTRA, by name or
as 2 and 3. SQLite reads other numbers by arithmetic of its own (7 is OFF): they are taken as
not syncing, and the writes go through as SQLite makes them. */
static int syncs_every_commit(const char *value) {
    return sqlite3_stricmp(value, "full") == 0 || sqlite3_stricmp(value, "extra") == 0 ||
           strcmp(value, "2") == 0 || strcmp(value, "3") == 0;
}

static int hl_file_control(sqlite3_file *f, int op, void *arg) {
    HlFile *p = (HlFile *)f;
    if (op == SQLITE_FCNTL_PRAGMA && p->db_name != NULL) {
        char **pragma = (char **)arg; /* [1] its name, [2] its value or NULL */
        if (sqlite3_stricmp(pragma[1], "synchronous") == 0 && pragma[2] != NULL) {
            if (p->partner && p->partner->buf_len) {
                int rc = hl_flush(p->partner);
                if (rc != SQLITE_OK) return rc;
            }
            p->syncs_commits = syncs_every_commit(pragma[2]);
        }
        return RM(p)->xFileControl(REAL(p), op, arg);
    }
    if (op == SQLITE_FCNTL_VFSNAME) { /* ours, then the wrapped one's */
        int rc = RM(p)->xFileControl(REAL(p), op, arg);
        if (rc == SQLITE_OK) {
            *(char **)arg = sqlite3_mprintf("%s/%z", hl_vfs.zName, *(char **)arg);
        }
        return rc;
    }
    int rc = hl_flush(p);
    if (rc != SQLITE_OK) return rc;
    return RM(p)->xFileControl(REAL(p), op, arg);
}

static int hl_sector_size(sqlite3_file *f) {
    HlFile *p = (HlFile *)f;
    return RM(p)->xSectorSize(REAL(p));
}

static int hl_device_characteristics(sqlite3_file *f) {
    HlFile *p = (HlFile *)f;
    return RM(p)->xDeviceCharacteristics(REAL(p));
}

static int hl_shm_map(sqlite3_file *f, int page, int size, int extend, void volatile **out) {
    HlFile *p = (HlFile *)f;
    return RM(p)->xShmMap(REAL(p), page, size, extend, out);
}

/* The wal-index's lock 0 is the WAL's write lock (wal.c WAL_WRITE_LOCK). */
#define WAL_WRITE_LOCK 0

static int hl_shm_lock(sqlite3_file *f, int offset, int n, int flags) {
    HlFile *p = (HlFile *)f;
    /* Whatever is gathered goes out before another connection may write the WAL. A commit's
    frames went out in its sync (or its barrier), before it was published: what is left here is
    a rolled-back transaction's, written before its COMMIT (a cache spill), past the WAL's last
    commit. SQLite wrote those at once; held, they would land later on the frames that the next
    writer puts at the same offsets, over its commit. Being no commit's, a failure to write them
    loses nothing (and SQLite's unlock returns nothing): they are dropped. */
    if ((flags & SQLITE_SHM_UNLOCK) && offset <= WAL_WRITE_LOCK && offset + n > WAL_WRITE_LOCK &&
        p->partner && p->partner->buf_len) {
        (void)hl_flush(p->partner);
    }
    return RM(p)->xShmLock(REAL(p), offset, n, flags);
}

static void hl_shm_barrier(sqlite3_file *f) {
    HlFile *p = (HlFile *)f;
    /* The wal-index header is written after this: the frames it names go to the file first.
    With synchronous=FULL, the only case where writes are gathered, the commit's xSync wrote
    them already and nothing is left here; this keeps it so whatever SQLite does. A failure here
    cannot be returned: the WAL's next call returns it. */
    HlFile *wal = p->partner;
    if (wal != NULL) {
        if (wal->buf_len) {
            int rc = hl_flush(wal);
            if (rc != SQLITE_OK) wal->failed = rc;
        }
        /* A commit that wrote the WAL: whether it synced it after (a barrier of a restart, or
        of a recovery, wrote nothing and tells nothing). */
        if (wal->written) p->seen_syncing = !wal->unsynced;
        wal->written = 0;
    }
    RM(p)->xShmBarrier(REAL(p));
}

static int hl_shm_unmap(sqlite3_file *f, int delete_flag) {
    HlFile *p = (HlFile *)f;
    return RM(p)->xShmUnmap(REAL(p), delete_flag);
}

static int hl_fetch(sqlite3_file *f, sqlite3_int64 off, int n, void **out) {
    HlFile *p = (HlFile *)f;
    return RM(p)->xFetch(REAL(p), off, n, out);
}

static int hl_unfetch(sqlite3_file *f, sqlite3_int64 off, void *page) {
    HlFile *p = (HlFile *)f;
    return RM(p)->xUnfetch(REAL(p), off, page);
}

static const sqlite3_io_methods hl_io = {
    3,
    hl_close,
    hl_read,
    hl_write,
    hl_truncate,
    hl_sync,
    hl_file_size,
    hl_lock,
    hl_unlock,
    hl_check_reserved_lock,
    hl_file_control,
    hl_sector_size,
    hl_device_characteristics,
    hl_shm_map,
    hl_shm_lock,
    hl_shm_barrier,
    hl_shm_unmap,
    hl_fetch,
    hl_unfetch,
};

static int hl_open(sqlite3_vfs *vfs, sqlite3_filename name, sqlite3_file *f, int flags, int *out) {
    (void)vfs;
    HlFile *p = (HlFile *)f;
    memset(p, 0, sizeof(HlFile));
    p->real = (sqlite3_file *)&p[1];
    int rc = root_vfs->xOpen(root_vfs, name, p->real, flags, out);
    if (p->real->pMethods == NULL) {
        p->base.pMethods = NULL;
        return rc;
    }
    /* Only files whose methods we can stand in for (the unix VFS's are version 3). */
    if (p->real->pMethods->iVersion < 3) {
        p->real->pMethods->xClose(p->real);
        p->base.pMethods = NULL;
        return SQLITE_CANTOPEN;
    }
    p->base.pMethods = &hl_io;
    if (rc != SQLITE_OK || name == NULL) return rc;
    if (flags & SQLITE_OPEN_MAIN_DB) {
        p->db_name = name;
        pthread_mutex_lock(&open_dbs_lock);
        p->next_db = open_dbs;
        open_dbs = p;
        pthread_mutex_unlock(&open_dbs_lock);
    } else if (flags & SQLITE_OPEN_WAL) {
        p->is_wal = 1;
        const char *db_name = sqlite3_filename_database(name);
        pthread_mutex_lock(&open_dbs_lock);
        for (HlFile *db = open_dbs; db; db = db->next_db) {
            if (db->db_name == db_name) {
                db->partner = p;
                p->partner = db;
                break;
            }
        }
        pthread_mutex_unlock(&open_dbs_lock);
        /* As sqlite3WalOpen decides it, from the database file: pad unless power-safe. */
        if (p->partner != NULL) {
            HlFile *db = p->partner;
            int characteristics = RM(db)->xDeviceCharacteristics(REAL(db));
            p->pads = (characteristics & SQLITE_IOCAP_POWERSAFE_OVERWRITE) == 0;
        }
    }
    return rc;
}

static int hl_delete(sqlite3_vfs *vfs, const char *name, int sync_dir) {
    (void)vfs;
    return root_vfs->xDelete(root_vfs, name, sync_dir);
}

static int hl_access(sqlite3_vfs *vfs, const char *name, int flags, int *out) {
    (void)vfs;
    return root_vfs->xAccess(root_vfs, name, flags, out);
}

static int hl_full_pathname(sqlite3_vfs *vfs, const char *name, int n, char *out) {
    (void)vfs;
    return root_vfs->xFullPathname(root_vfs, name, n, out);
}

static void *hl_dlopen(sqlite3_vfs *vfs, const char *name) {
    (void)vfs;
    return root_vfs->xDlOpen(root_vfs, name);
}

static void hl_dlerror(sqlite3_vfs *vfs, int n, char *out) {
    (void)vfs;
    root_vfs->xDlError(root_vfs, n, out);
}

static void (*hl_dlsym(sqlite3_vfs *vfs, void *h, const char *sym))(void) {
    (void)vfs;
    return root_vfs->xDlSym(root_vfs, h, sym);
}

static void hl_dlclose(sqlite3_vfs *vfs, void *h) {
    (void)vfs;
    root_vfs->xDlClose(root_vfs, h);
}

static int hl_randomness(sqlite3_vfs *vfs, int n, char *out) {
    (void)vfs;
    return root_vfs->xRandomness(root_vfs, n, out);
}

static int hl_sleep(sqlite3_vfs *vfs, int us) {
    (void)vfs;
    return root_vfs->xSleep(root_vfs, us);
}

static int hl_current_time(sqlite3_vfs *vfs, double *out) {
    (void)vfs;
    return root_vfs->xCurrentTime(root_vfs, out);
}

static int hl_get_last_error(sqlite3_vfs *vfs, int n, char *out) {
    (void)vfs;
    return root_vfs->xGetLastError(root_vfs, n, out);
}

static int hl_current_time_int64(sqlite3_vfs *vfs, sqlite3_int64 *out) {
    (void)vfs;
    return root_vfs->xCurrentTimeInt64(root_vfs, out);
}

static PyObject *walbuffer_register(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (sqlite3_vfs_find(name) != NULL) Py_RETURN_NONE; /* registered before */
    if (root_vfs != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "registered under another name");
        return NULL;
    }
    sqlite3_vfs *root = sqlite3_vfs_find(NULL);
    if (root == NULL || root->iVersion < 2 || strcmp(root->zName, "unix") != 0) {
        PyErr_SetString(PyExc_RuntimeError, "the default SQLite VFS is not unix");
        return NULL;
    }
    char *copy = strdup(name);
    if (copy == NULL) return PyErr_NoMemory();
    root_vfs = root;
    hl_vfs.iVersion = 2;
    hl_vfs.szOsFile = (int)sizeof(HlFile) + root->szOsFile;
    hl_vfs.mxPathname = root->mxPathname;
    hl_vfs.zName = copy;
    hl_vfs.xOpen = hl_open;
    hl_vfs.xDelete = hl_delete;
    hl_vfs.xAccess = hl_access;
    hl_vfs.xFullPathname = hl_full_pathname;
    hl_vfs.xDlOpen = hl_dlopen;
    hl_vfs.xDlError = hl_dlerror;
    hl_vfs.xDlSym = hl_dlsym;
    hl_vfs.xDlClose = hl_dlclose;
    hl_vfs.xRandomness = hl_randomness;
    hl_vfs.xSleep = hl_sleep;
    hl_vfs.xCurrentTime = hl_current_time;
    hl_vfs.xGetLastError = hl_get_last_error;
    hl_vfs.xCurrentTimeInt64 = hl_current_time_int64;
    int rc = sqlite3_vfs_register(&hl_vfs, 0);
    if (rc != SQLITE_OK) {
        root_vfs = NULL;
        free(copy);
        PyErr_Format(PyExc_RuntimeError, "sqlite3_vfs_register: %d", rc);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *walbuffer_counts(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("(KK)", __atomic_load_n(&gathered, __ATOMIC_RELAXED),
                         __atomic_load_n(&written, __ATOMIC_RELAXED));
}

static PyMethodDef walbuffer_methods[] = {
    {"counts", walbuffer_counts, METH_NOARGS,
     "counts() -> (writes gathered, writes that carried them to the file), in this process."},
    {"register", walbuffer_register, METH_VARARGS,
     "register(name): the VFS, under `name`, in the SQLite library this process loaded."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef walbuffer_module = {
    PyModuleDef_HEAD_INIT, "_walbuffer", NULL, -1, walbuffer_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__walbuffer(void) { return PyModule_Create(&walbuffer_module); }
