/* p11p client — the library's one internal lock (it guards the connection pool): a
 * pthread mutex, or the application's mutex callbacks when C_Initialize was given
 * callbacks without CKF_OS_LOCKING_OK, as PKCS#11 v2.40 section 6.6.2 requires. */
#ifndef P11P_LOCK_H
#define P11P_LOCK_H

#include <pthread.h>

#include "p11p-extra.h"

struct p11p_lock {
	int app;                 /* the application's callbacks, else the pthread mutex */
	pthread_mutex_t mutex;
	void *app_mutex;
	CK_CREATEMUTEX create;
	CK_DESTROYMUTEX destroy;
	CK_LOCKMUTEX lock;
	CK_UNLOCKMUTEX unlock;
};

/* app: the C_Initialize arguments whose callbacks to use, or NULL for pthread. */
CK_RV p11p_lock_init(struct p11p_lock *l, const CK_C_INITIALIZE_ARGS *app);
CK_RV p11p_lock_acquire(struct p11p_lock *l);
void p11p_lock_release(struct p11p_lock *l);
void p11p_lock_destroy(struct p11p_lock *l);

#endif
