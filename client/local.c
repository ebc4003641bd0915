/* p11p client — the Cryptoki functions the library answers itself: C_Initialize (its
 * arguments and locking), C_Finalize, C_GetInfo, C_GetFunctionList, and the legacy
 * C_GetFunctionStatus/C_CancelFunction. C_Initialize sets up local state only: it
 * succeeds without a daemon, and the first call that travels connects. */
#include <string.h>

#include "call.h"
#include "link.h"
#include "state.h"

extern CK_FUNCTION_LIST p11p_function_list;

#define P11P_LIBRARY_VERSION_MAJOR 0
#define P11P_LIBRARY_VERSION_MINOR 1

P11P_EXPORT CK_RV C_Initialize(CK_VOID_PTR pInitArgs)
{
	const CK_C_INITIALIZE_ARGS *args = pInitArgs;
	int callbacks;

	if (args == NULL)
		return p11p_state_setup(NULL);
	if (args->pReserved != NULL)
		return CKR_ARGUMENTS_BAD;
	callbacks = (args->CreateMutex != NULL) + (args->DestroyMutex != NULL) +
		    (args->LockMutex != NULL) + (args->UnlockMutex != NULL);
	if (callbacks != 0 && callbacks != 4)
		return CKR_ARGUMENTS_BAD;
	/* PKCS#11 v2.40 6.6.2: callbacks without CKF_OS_LOCKING_OK must be used; with the
	 * flag, or without callbacks, the library may lock natively. */
	if (callbacks == 4 && !(args->flags & CKF_OS_LOCKING_OK))
		return p11p_state_setup(args);
	return p11p_state_setup(NULL);
}

/* Sends C_Finalize (on an idle connection, when there is one) so the daemon ends the
 * context at once, shuts down connections that are waiting (C_WaitForSlotEvent returns
 * CKR_CRYPTOKI_NOT_INITIALIZED), closes the rest. */
P11P_EXPORT CK_RV C_Finalize(CK_VOID_PTR pReserved)
{
	if (pReserved != NULL) {
		CK_RV rv = p11p_enter();

		if (rv != CKR_OK)
			return rv;
		p11p_leave();
		return CKR_ARGUMENTS_BAD;
	}
	return p11p_state_teardown();
}

static void pad(CK_UTF8CHAR *field, size_t size, const char *text)
{
	size_t n = strlen(text);

	memset(field, ' ', size);
	memcpy(field, text, n < size ? n : size);
}

P11P_EXPORT CK_RV C_GetInfo(CK_INFO_PTR pInfo)
{
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	p11p_leave();
	if (pInfo == NULL)
		return CKR_ARGUMENTS_BAD;
	memset(pInfo, 0, sizeof *pInfo);
	pInfo->cryptokiVersion.major = 2;
	pInfo->cryptokiVersion.minor = 40;
	pad(pInfo->manufacturerID, sizeof pInfo->manufacturerID, "p11p");
	pInfo->flags = 0;
	pad(pInfo->libraryDescription, sizeof pInfo->libraryDescription,
	    "p11p PKCS#11 proxy client");
	pInfo->libraryVersion.major = P11P_LIBRARY_VERSION_MAJOR;
	pInfo->libraryVersion.minor = P11P_LIBRARY_VERSION_MINOR;
	return CKR_OK;
}

P11P_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList)
{
	if (ppFunctionList == NULL)
		return CKR_ARGUMENTS_BAD;
	*ppFunctionList = &p11p_function_list;
	return CKR_OK;
}

/* Legacy parallel-function calls: not supported, as PKCS#11 v2.40 allows. */
static CK_RV not_parallel(void)
{
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	p11p_leave();
	return CKR_FUNCTION_NOT_PARALLEL;
}

P11P_EXPORT CK_RV C_GetFunctionStatus(CK_SESSION_HANDLE hSession)
{
	(void)hSession;
	return not_parallel();
}

P11P_EXPORT CK_RV C_CancelFunction(CK_SESSION_HANDLE hSession)
{
	(void)hSession;
	return not_parallel();
}
