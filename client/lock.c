/* p11p client — the internal lock: pthread, or the application's mutex callbacks. */
#include <string.h>

#include "lock.h"

CK_RV p11p_lock_init(struct p11p_lock *l, const CK_C_INITIALIZE_ARGS *app)
{
	memset(l, 0, sizeof *l);
	if (app == NULL)
		return pthread_mutex_init(&l->mutex, NULL) == 0 ? CKR_OK : CKR_CANT_LOCK;
	l->app = 1;
	l->create = app->CreateMutex;
	l->destroy = app->DestroyMutex;
	l->lock = app->LockMutex;
	l->unlock = app->UnlockMutex;
	return l->create(&l->app_mutex);
}

CK_RV p11p_lock_acquire(struct p11p_lock *l)
{
	if (l->app)
		return l->lock(l->app_mutex);
	return pthread_mutex_lock(&l->mutex) == 0 ? CKR_OK : CKR_CANT_LOCK;
}

void p11p_lock_release(struct p11p_lock *l)
{
	if (l->app)
		(void)l->unlock(l->app_mutex);
	else
		pthread_mutex_unlock(&l->mutex);
}

void p11p_lock_destroy(struct p11p_lock *l)
{
	if (l->app)
		(void)l->destroy(l->app_mutex);
	else
		pthread_mutex_destroy(&l->mutex);
	memset(l, 0, sizeof *l);
}
